"""Federated simulation: client partitions (partition.py), the digits task (digits.py) and the LEAF
Shakespeare split of every speaking role into a client (roles.py)."""
