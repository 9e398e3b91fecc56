"""Hostile inputs: each case ends with a CloudletsError subclass, in bounded
time and memory, leaving nothing behind (issue 16)."""
