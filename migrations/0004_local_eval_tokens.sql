-- The held-out target tokens an update's local_eval_loss was measured on. 0: the site had no
-- held-out window at the task's sequence length, and local_eval_loss (stored as 0) is no
-- measurement. NULL for updates received before this column existed, or from a client that
-- predates the count.
-- The SQLite twin is sqlite/0004_local_eval_tokens.sql.
ALTER TABLE updates ADD COLUMN local_eval_tokens BIGINT CHECK (local_eval_tokens >= 0);
