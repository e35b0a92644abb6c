"""The catalog: endpoints, CVDs, snapshots, policies, tokens, transactions and audit log."""
