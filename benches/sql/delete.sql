\set id random(3, :maxid)
DELETE FROM orders WHERE id = :id;
