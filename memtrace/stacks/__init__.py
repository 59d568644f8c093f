"""Resident memory by call stack: sampling, unwinding, netting (issue 13)."""
