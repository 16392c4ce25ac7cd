"""Exercise 11: one merge of BPE training.

A training corpus is split into chunks ("words"); each distinct word is kept once,
as a tuple of token ids, with its count. Start: ids 0..255 are the bytes.
One merge:
1. count every adjacent pair of ids over all words, each word weighted by its count;
2. pick the most frequent pair; among equal counts, the smallest pair (compare
   (left, right) as tuples);
3. in every word, replace each occurrence of the pair, left to right and not
   overlapping, by the new id ("aaa" with the pair (a, a) becomes (new, a)).

    words {(104, 105): 3, (104, 105, 104, 105): 1}, new_id 256
      -> pair (104, 105), words {(256,): 3, (256, 256): 1}

Read first: docs/tokenizer.md. Check: tinygen exercises check DIR bpe_merge
"""


def merge_step(words, new_id):
    """words {tuple of ids: count}, new_id int -> (pair (left, right), new words {tuple: count}).

    Assume at least one word has two or more ids. Do not modify `words`.
    """
    raise NotImplementedError
