"""Dev cluster: a real Kubernetes control plane with fake GPU nodes, a pod runner and
MinIO on one machine, without Docker. See DevCluster and `make dev-up`."""
