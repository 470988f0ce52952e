"""Test kits shared by the suites: servers in-process and as processes, clients, virtqueue and Xen
ring drivers, the session fuzz kit."""
