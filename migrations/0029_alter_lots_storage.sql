-- The storage quota a lot carries, copied from its package when bought
-- (the trial's for granted time); an owner's quota is the largest among
-- their live lots.
ALTER TABLE lots ADD COLUMN storage_mib INT UNSIGNED NOT NULL DEFAULT 1024
