\set id random(3, 2000000)
UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = :id;
