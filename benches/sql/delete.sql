\set id random(3, 2000000)
DELETE FROM orders WHERE id = :id;
