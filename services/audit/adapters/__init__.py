"""Adapters of the audit store port: SQLite (embedded) and MongoDB (cluster)."""
