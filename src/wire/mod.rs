//! PostgreSQL wire protocol codec shared by the proxy and the rest of pgfire: framing with checked
//! lengths and typed decoders for the few messages pgfire looks into. Pure and synchronous.
