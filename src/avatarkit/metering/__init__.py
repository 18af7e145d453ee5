"""Metering: what every vendor session cost, and which ones may still be running.

Avatar vendors bill by the minute from the moment a session is created until it is ended at
the vendor, whether or not anyone is watching. A process that crashes between the two leaves
a session billing until the vendor's own timeout. :mod:`avatarkit.metering.ledger` is the
durable record that closes that gap: one row per vendor session attempt, written *before* the
vendor is asked to create it, closed only once the vendor confirmed the end, readable by a
reaper in another process and by usage and budget queries.

This package imports nothing on purpose, so that ``import avatarkit.metering`` stays cheap;
import :mod:`avatarkit.metering.ledger` for the ledger itself.
"""
