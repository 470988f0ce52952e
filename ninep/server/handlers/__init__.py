"""The request handlers: those every dialect shares (`common`), 9P2000.L's (`dotl`), 9P2000 and
9P2000.u's (`legacy`), the checks they share (`shared`), and the table per dialect (`tables`) the
server hands to each session; the session module never imports any of them.
"""
