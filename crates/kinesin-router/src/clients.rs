//! gRPC clients of other nodes, one lazily connected channel per address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kinesin_proto::v1::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint};

use kinesin_proto::MAX_MESSAGE_BYTES;

#[derive(Default)]
pub(crate) struct NodeClients {
    channels: Mutex<HashMap<String, Channel>>,
}

impl NodeClients {
    pub(crate) fn get(&self, addr: &str) -> Result<NodeClient<Channel>, String> {
        let mut channels = self.channels.lock().expect("clients lock");
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad node address {addr}: {e}"))?
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
