\set id random(3, :maxid)
UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = :id;
