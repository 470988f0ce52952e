"""The 9P server: connections (server), per-connection state (session), a request in flight
(request), the fid table (fids) and how a fid ends on its backend (release), limits, exports,
identities, the operation policy, and the request handlers of each dialect (handlers/, whose tables
the server hands to each session).

Imports the wire (`ninep.protocol`), the metrics it feeds, backends through their Protocols and
transports through their base interfaces; never the CLI.
"""
