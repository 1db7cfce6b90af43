//! The site daemon: joins the federation and works through tasks.
