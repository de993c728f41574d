"""`ftcluster sweep`: hyperparameter sweeps whose trials are full `ftcluster train` runs."""
