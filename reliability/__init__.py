"""Reliability harness: fault, kill and soak scripts for facegate (see README-reliability.md)."""
