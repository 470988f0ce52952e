"""The 9P server: connections (server), per-connection state (session), the fid table, limits,
exports, identities, the operation policy, and the request handlers of each dialect.

Imports the wire (`ninep.protocol`), backends through their Protocols and transports through their
base interfaces; never the CLI.
"""
