//! gRPC clients of other nodes, one lazily connected channel per address.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kinesin_proto::tls::Dialer;
use kinesin_proto::v1::node_client::NodeClient;
use tonic::transport::Channel;

use kinesin_proto::MAX_MESSAGE_BYTES;

pub(crate) struct NodeClients {
    dialer: Dialer,
    channels: Mutex<HashMap<String, Channel>>,
}

impl NodeClients {
    pub(crate) fn new(dialer: Dialer) -> NodeClients {
        NodeClients {
            dialer,
            channels: Mutex::default(),
        }
    }

    pub(crate) fn get(&self, addr: &str) -> Result<NodeClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .dialer
                    .endpoint(addr)?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(NodeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}
