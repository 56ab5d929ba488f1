-- The orders service's first table.
-- risk: low
SET lock_timeout = '2s';
CREATE TABLE public.orders (
  id          bigserial PRIMARY KEY,
  customer_id bigint NOT NULL,
  amount      numeric(12,2) NOT NULL,
  status      text NOT NULL DEFAULT 'new',
  created_at  timestamptz NOT NULL DEFAULT now()
);
