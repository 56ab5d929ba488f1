"""Reads a topic rowshift produced with the stock Kafka client and decodes
every key and value from the Confluent wire format (magic byte 0, 4-byte
schema id, Avro datum) with fastavro and the schemas from the registry.
Prints one JSON line per record: {"key": ..., "value": ... or null}."""
import io, json, struct, sys, time, urllib.request
from confluent_kafka import Consumer
import fastavro

brokers, topic, registry, expected = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
schemas = {}

def schema(schema_id):
    if schema_id not in schemas:
        with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}") as r:
            schemas[schema_id] = fastavro.parse_schema(json.loads(json.loads(r.read())["schema"]))
    return schemas[schema_id]

def decode(raw):
    if raw is None:
        return None
    magic, schema_id = struct.unpack(">bI", raw[:5])
    assert magic == 0, f"magic byte {magic}"
    return fastavro.schemaless_reader(io.BytesIO(raw[5:]), schema(schema_id))

def plain(v):
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if not isinstance(v, (str, int, float, bool, type(None))):
        return str(v)
    return v

c = Consumer({"bootstrap.servers": brokers, "group.id": f"interop-{topic}", "auto.offset.reset": "earliest",
              "session.timeout.ms": 6000, "enable.auto.commit": False})
c.subscribe([topic])
n, deadline = 0, time.time() + 60
while n < expected and time.time() < deadline:
    m = c.poll(1.0)
    if m is None or m.error():
        continue
    print(json.dumps({"key": plain(decode(m.key())), "value": plain(decode(m.value()))}, sort_keys=True))
    n += 1
c.close()
sys.exit(0 if n == expected else 3)
