"""Temporal state for BEV models: ego-motion alignment and sequence runners."""
