"""Metrics: per-connection and per-export counters and latency histograms (counters), and the
endpoints that publish them (a stats socket and Prometheus text, endpoints).
"""
