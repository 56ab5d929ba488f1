SET lock_timeout = '2s';
-- lint:allow breaking-change undoing V2 removes the column it added
ALTER TABLE public.orders DROP COLUMN priority;
