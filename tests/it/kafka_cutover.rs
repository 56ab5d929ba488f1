//! The cut-over with the forward stream through Kafka (tansu): `verify
//! --repair` re-reads mismatched ranges through the topic, the cut-over
//! under load drains the appliers before the swap (the reverse stream then
//! runs direct), a rollback turns the kafka stream back on, and every step
//! ends in a full comparison.

use crate::cutover::*;
use crate::registry::Registry;
use crate::support::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_repair_and_rollback_through_kafka() {
    let registry = Registry::start();
    let brokers = std::env::var("ROWSHIFT_TEST_KAFKA_TANSU").expect("ROWSHIFT_TEST_KAFKA_TANSU");
    let transport = format!(
        "cutover: {{ lock_timeout_ms: 1000 }}\ntransport:\n  kind: kafka\n  kafka:\n    \
         brokers: \"{brokers}\"\n    registry_url: \"{}\"\n    partitions: 3\n",
        registry.url
    );
    let (db, c, name, _run) = caught_up_orders("kco", &transport).await;

    // A changed, a deleted and an extra target row, repaired through the topic.
    corrupt_target(&c).await;
    let load = repair_under_load(&db, &name).await;

    // Cut over under the load: every committed write is in the live table.
    cut_over_under(&db, &c, &name, load, 100).await;
    wait_applied(&c, &name).await;
    if let Some(d) = diff(&c, OLD_MAPPED, NEW_AS_TABLE).await {
        panic!("old and new differ after the cut-over:\n{d}");
    }

    // Roll back under load; the forward stream through Kafka resumes.
    let load = start_load(&db, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&db.rowshift(&["rollback", &name]), "rollback");
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    assert_eq!(live_shape(&c).await, "old");
    c.batch_execute("UPDATE orders SET amount = amount + 1 WHERE id % 13 = 0")
        .await
        .expect("writes on the old table");
    wait_applied(&c, &name).await;
    let old_live = "SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders";
    let new_shadow = "(SELECT id, customer_id, amount_cents, state, note FROM orders_v2) n";
    if let Some(d) = diff(&c, old_live, new_shadow).await {
        panic!("the kafka stream did not carry the writes after the rollback:\n{d}");
    }
    finish(&db, &c, &name).await;
}
