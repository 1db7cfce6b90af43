-- Aggregation strategies (issue #4): which LoRA factors each training round trains, and the server
-- optimizer's state (first and second moments, safetensors) kept with each global adapter.
-- The PostgreSQL twin is ../0002_strategies.sql.
ALTER TABLE rounds ADD COLUMN trained TEXT NOT NULL DEFAULT 'both' CHECK (trained IN ('both', 'a', 'b'));
ALTER TABLE global_adapters ADD COLUMN optimizer_state BLOB;
