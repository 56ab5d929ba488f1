\set c random(1, 1000)
INSERT INTO orders (customer_id, amount, status, note, legacy_flag) VALUES (:c, 12.50, 'new', 'inserted by the lag benchmark, a note of about the usual size for this table', false);
