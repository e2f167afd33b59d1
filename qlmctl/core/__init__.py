"""The QLM core: requests, groups, virtual queues, the RWT estimator and the cluster seam."""
