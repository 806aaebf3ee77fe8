//! The reverse proxy in front of a service: HTTP/1.1 (or raw TCP) to whichever instance is
//! live, switched atomically. Written by the proxy work; see the module's tests.
