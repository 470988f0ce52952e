"""The FUSE frontend: a pyfuse3 filesystem over any Backend (a host directory, or a 9P server
through the remote backend).
"""
