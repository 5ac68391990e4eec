//! The `troop` node: worker and gateway roles on a libp2p mesh.

pub mod answer;
pub mod commands;
pub mod coordinator_client;
pub mod demo;
pub mod evidence;
pub mod frames_io;
pub mod gateway;
pub mod hardware;
pub mod network;
pub mod receipts;
pub mod upstream;
pub mod web;
pub mod worker;
