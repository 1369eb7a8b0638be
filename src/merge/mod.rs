//! Task vectors, sparsifiers and mergekit's merge methods, streamed or in memory. Arrives with the
//! Merge issue.
