\set id random(1, 100000)
\set r random(1, 10)
BEGIN;
UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = :id;
INSERT INTO orders (customer_id, amount, status, note) VALUES (:r, :r * 3.5, 'new', 'load');
DELETE FROM orders WHERE id = :id + 7;
COMMIT;
