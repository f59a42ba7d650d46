//! Any bytes on any subject: decoding never panics, and whatever decodes
//! re-encodes to something that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagestream_schemas::*;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(msg) = decode::<M>(data) {
        let again: M = decode(&encode(&msg)).expect("re-encoded message decodes");
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<DocumentSubmitted>(data);
    round_trip::<PageRendered>(data);
    round_trip::<PageInferred>(data);
    round_trip::<DocumentFailed>(data);
    round_trip::<Event>(data);
    round_trip::<DeadLetter>(data);
});
