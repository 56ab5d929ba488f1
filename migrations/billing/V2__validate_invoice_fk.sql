-- Validating allows concurrent writes (SHARE UPDATE EXCLUSIVE).
-- risk: medium
-- environments: staging, prod
SET lock_timeout = '2s';
ALTER TABLE public.invoices VALIDATE CONSTRAINT invoices_order_fk;
