"""Transports: how 9P messages reach the server (stream sockets and fds, virtio rings over
vhost-user, Xen 9pfs rings). Each yields `Channel`s; see `transports.base`.

`options` (a leaf: listen/connect options, TLS config, direct-I/O policy, AddressError) ·
`address` (scheme → transport) · `sockets` (tcp:/unix:/fd: addresses) over `stream` (framing)
and `tls` (handshakes) · `activation` (systemd sockets) · `virtio/` · `xen/` · `ring/` (the
compiled data path, typed by `_ring.pyi`). From `ninep` this package imports only the wire,
`ninep.protocol`, and must never import the server or the CLI."""
