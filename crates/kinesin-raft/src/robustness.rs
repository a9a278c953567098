//! Property test of the decoders a peer's bytes reach, with the check of
//! [`crate::fuzzing`] (which a coverage-guided fuzz target runs too).

use proptest::prelude::*;

proptest! {
    #[test]
    fn any_bytes_decode_to_a_raft_message_or_an_error(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        crate::fuzzing::peer_message(&bytes);
    }
}
