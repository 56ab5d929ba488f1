-- Invoices reference orders, so the orders table must exist first.
-- depends_on: orders:1
-- risk: low
SET lock_timeout = '2s';
CREATE TABLE public.invoices (
  id       bigserial PRIMARY KEY,
  order_id bigint NOT NULL,
  cents    bigint NOT NULL
);
ALTER TABLE public.invoices ADD CONSTRAINT invoices_order_fk
  FOREIGN KEY (order_id) REFERENCES public.orders (id) NOT VALID;
