"""The request handlers: one module per dialect (9P2000.L in `dotl`, 9P2000/9P2000.u in `legacy`)
plus the helpers they share. The server hands the table to each session; nothing here reaches back
into the session module at import time.
"""
