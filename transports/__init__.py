"""Transports: how 9P messages reach the server (stream sockets and fds, virtio rings over
vhost-user, Xen 9pfs rings). Each yields `Channel`s; see `transports.base`."""
