"""The wire: 9P numbers, messages declared once with construct, the codec, and the plain types
every layer shares (`Qid`).

A leaf: nothing here imports any other part of ninep, fs_backends or transports.
"""
