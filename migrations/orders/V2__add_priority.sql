-- risk: low
SET lock_timeout = '2s';
ALTER TABLE public.orders ADD COLUMN priority smallint NOT NULL DEFAULT 0;
