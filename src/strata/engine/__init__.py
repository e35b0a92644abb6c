"""Operations on a store: backup, restore, diff, check, retention and prune."""
