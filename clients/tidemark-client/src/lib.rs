//! Typed async client over the four Tidemark services
