//! A Kafka message's `ChangeRecord` (`tidemark.common.v1`), the bytes a
//! change feed hands the replicator: whatever a producer wrote must decode
//! or be refused, never panic; what decodes survives a re-encode exactly;
//! and the wire decoder decodes exactly what prost's generated decoder
//! does, to the same record, whether it keeps the image encoded or not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_connectors::Position;
use tidemark_connectors::proto::{
    decode_change, decode_change_encoded, decode_change_with_prost, encode_change, kafka_key,
};

fn position() -> Position {
    Position {
        partition: "topic/0".to_owned(),
        sequence: "1".to_owned(),
    }
}

fuzz_target!(|data: &[u8]| {
    let decoded = decode_change(data, position());
    assert_eq!(
        decode_change_encoded(&data.into(), position()),
        decoded,
        "kept encoded or not, the same record"
    );
    match (&decoded, decode_change_with_prost(data, position())) {
        (Ok(a), Ok(b)) => assert_eq!(a, &b, "both decoders read the same record"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the wire decoder says {a:?}, prost {b:?}"),
    }
    let Ok(record) = decoded else {
        return;
    };
    let image = record.new_image.clone().map(tidemark_connectors::Image::into_item);
    let bytes = encode_change(
        &record.key,
        image.as_ref(),
        record.version,
        record.created_at_micros,
    );
    let again = decode_change(&bytes, position()).expect("a re-encoded record decodes");
    assert_eq!(again.key, record.key, "the key round-trips");
    assert_eq!(again.kind, record.kind);
    assert_eq!(again.new_image, record.new_image, "the image round-trips");
    assert_eq!(again.version, record.version);
    assert_eq!(
        again.created_at_micros, record.created_at_micros,
        "the change time round-trips"
    );
    // The message key that places the record in a partition is stable.
    let partition = record.key.0.keys().next().expect("a key has attributes");
    assert_eq!(
        kafka_key(&again.key, partition),
        kafka_key(&record.key, partition)
    );
});
