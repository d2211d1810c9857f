"""Data: embedded synthetic AffectNet / FEC / unlabelled face sources and the Grain pipeline."""
