"""HTTP serving of the purifier and a classifier on Ray Serve: requests, batching, the app."""
