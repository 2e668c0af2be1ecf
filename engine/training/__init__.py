"""Training DAEs and classifiers, and calibrating mu and sigma on held-out data."""
