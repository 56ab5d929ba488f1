-- An index on a table that already has rows: built without blocking writes,
-- which cannot run inside a transaction.
-- transactional: false
-- risk: medium
-- estimated_duration: 10m
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_customer_idx ON public.orders (customer_id);
